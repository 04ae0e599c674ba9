"""What runs leave behind for people: the shared results table (:mod:`.store`), ``flowvae table`` (:mod:`.table`),
experiment tracking in MLflow (:mod:`.tracking`) and the pictures (:mod:`.plots`)."""
