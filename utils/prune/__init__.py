"""Channel pruning: dependency groups (:mod:`.groups`), cutting (:mod:`.surgery`), costs (:mod:`.cost`),
Network Slimming (:mod:`.slim`), EagleEye (:mod:`.eagleeye`), reports and files (:mod:`.report`, :mod:`.io`)."""
