"""Training: the loop (:mod:`.loop`, ``fit``), the stacked loop over seeds (:mod:`.stacked`, ``fit_stacked``), the
kit they share (:mod:`.kit`: checkpoints, validation, the schedule, the loss passes, progress, an epoch's end), and
the callbacks both tell and ask (:mod:`.callbacks`: curves, tracker, pruning, stop requests)."""
