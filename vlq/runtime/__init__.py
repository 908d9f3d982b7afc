"""Light infrastructure every stage uses: errors, console and progress, the cache folder, compatibility shims
(compat), hardware and capability probes, atomic files, run-folder locks, ModelOpt's CUDA extensions.

Nothing here imports a stage package.
"""
