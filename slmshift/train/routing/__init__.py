"""Routing from paired outcomes (S6): the paired table (`pairs`), its replay under a routing (`replay`), scorers
(`scorers`), the Ray Tune search (`search`), the figures and their intervals (`estimate`, `metrics`, `measure`),
the report (`report`), `slmshift tune` itself (`tune`) and its verification on unseen tasks (`verify`)."""
