"""One run from start to finish: every check before work (:mod:`.preflight`), the experiment itself
(:mod:`.experiment`), the job around it that claims, resumes and records (:mod:`.job`), a search trial's link
(:mod:`.trial`), and a finished run rebuilt from its directory (:mod:`.rebuild`)."""
