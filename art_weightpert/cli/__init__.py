"""
The ``art-weightpert`` command line (``demo``, ``evaluate``, ``train``), a client of the library: the parser
(:mod:`.parser`), the commands (:mod:`.commands`, :mod:`.train`), the report (:mod:`.report`; its optional sections
bit flips and generalization measures in :mod:`.sections`; as text in :mod:`.render` and :mod:`.render_sections`;
plots from :mod:`art_weightpert.metrics.plots`) and the loading of the user's model (:mod:`.models`,
``torch.export`` programs in :mod:`.exported`). Run it as ``art-weightpert`` or ``python -m art_weightpert.cli``.
"""

from art_weightpert.cli.commands import main

__all__ = ["main"]
