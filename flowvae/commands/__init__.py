"""The commands besides ``train``: ``score``, ``generate``, ``evaluate``; each a module with ``main(args) -> exit
code``, thin over the packages below it (the dispatcher is :mod:`flowvae.cli`)."""
