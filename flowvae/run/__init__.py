"""One run from start to finish: every check before work (:mod:`.preflight`), the experiment itself
(:mod:`.experiment`), the job around it that claims, resumes and records (:mod:`.job`), the result row it writes
(:mod:`.row`), a two-stage prior and the latent's gap (:mod:`.two_stage`), a search trial's link
(:mod:`.trial`), and a finished run rebuilt from its directory (:mod:`.rebuild`)."""
