"""``doc_to_image`` of vlq's shipped image+text lm-eval tasks: a row's image, drawn again from its seed."""


def doc_to_image(doc):
    from vlq.evaluation.tasks import image_of

    return [image_of(int(doc["seed"]))["image"]]
