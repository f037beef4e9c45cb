"""The pipeline's contract and machinery, no model code: recipes and targets (the data a run is made from:
``recipe``, ``tables``, ``target``), what a stage is and declares (``stage``), the run folder's layout
(``layout``, the only place that spells it) and the runner that executes, skips, shares and records stages
(``runner``). The stages themselves are in ``edgepeft.stages``.
"""
