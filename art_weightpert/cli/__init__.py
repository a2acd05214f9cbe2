"""
The ``art-weightpert`` command line (``demo``, ``evaluate``, ``train``), a client of the library: the parser
(:mod:`.parser`), the commands (:mod:`.commands`), the report (:mod:`.report`, :mod:`.render`; plots from
:mod:`art_weightpert.metrics.plots`) and the loading of the user's model (:mod:`.models`). Run it as
``art-weightpert`` or ``python -m art_weightpert.cli``.
"""

from art_weightpert.cli.commands import main

__all__ = ["main"]
