"""The undefended row: the attacked model, unchanged.

Not a defense from a paper; it gives every leaderboard its baseline (the
attack's own clean accuracy and ASR) and DER's reference point (DER = 0.5).
"""

from __future__ import annotations

import copy

from backdoor_harness.toolkit import Defense, Purified, hookimpl


class NoDefense(Defense):
    name = "none"
    version = "1"
    summary = "no defense: the attacked model as is (the baseline row)"
    paper = "-"
    baseline = True

    def purify(self, model, ctx):
        return Purified(copy.deepcopy(model))


@hookimpl
def harness_defenses():
    return [NoDefense]
