"""Channel pruning: dependency groups (:mod:`.groups`), cutting (:mod:`.surgery`), costs (:mod:`.cost`),
Network Slimming (:mod:`.slim`, sparse training in :mod:`.sparsity`), EagleEye (:mod:`.eagleeye`), reports and
files (:mod:`.report`, :mod:`.io`), and the two tools' shared frame (:mod:`.workflow`)."""
