"""Training: the loop (:mod:`.loop`, ``fit``), the stacked loop over seeds (:mod:`.stacked`, ``fit_stacked``), and
the kit they share (:mod:`.kit`: checkpoints, validation, the schedule, the loss passes, progress)."""
