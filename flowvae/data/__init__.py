"""Events in and out of model space: reading files and their layouts (:mod:`.events`), the per-feature transforms
and standardization (:mod:`.transforms`), and the tensors a model takes and the data units it gives back
(:mod:`.units`)."""
