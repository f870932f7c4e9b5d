"""Channel pruning: dependency groups traced by Torch-Pruning and filtered by the registry's declarations
(:mod:`.groups`), checked numerically (:mod:`.verify`, composed in :mod:`.analysis`), cutting (:mod:`.surgery`),
costs (:mod:`.cost`), Network Slimming (:mod:`.slim`; its sparse training is :mod:`utils.compress.sparsity`),
EagleEye (:mod:`.eagleeye`), reports and files (:mod:`.report`, :mod:`.io`). The two tools' shared frame is
:mod:`utils.runners.prune`."""
