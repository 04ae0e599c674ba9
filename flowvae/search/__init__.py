"""The Optuna side of a search, without Hydra: the space and the study's identity (:mod:`.space`), the storage
(:mod:`.storage`) and the pruners (:mod:`.pruning`)."""
