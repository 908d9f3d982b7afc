"""ModelOpt AutoQuantize recipes in and out.

In: :func:`vlq.recipes.reading.read_recipe` loads a recipe with ModelOpt's own loader
(``modelopt.recipe.load_recipe``) and maps it onto vlq's :class:`vlq.search.scheme.Scheme`: candidate formats by
their quantizer configs (:mod:`vlq.formats.registry`), effective bits, method, score size (-> score steps), the
disabled / cost-excluded patterns and module search spaces; :func:`vlq.recipes.reading.differences` says where
vlq's LM-only search departs from it.  Out: :func:`vlq.recipes.writing.recipe_yaml` writes the recipe that
reproduces a run's search.  :mod:`vlq.recipes.names` resolves a shipped name or a file without importing
ModelOpt, so a missing recipe is refused before anything heavy loads.
"""
