"""emomerge.experiment: the whole study — train, merge, evaluate, report (DESIGN.md, Layers).

The orchestration layer above training and evaluation: :mod:`.config` (the experiment YAML),
:mod:`.run` (``run_experiment``), :mod:`.plan` (``emomerge run --plan``), :mod:`.demo`
(``emomerge demo``), :mod:`.report` (tables over seeds) and :mod:`.plots` (the variant × dataset
figure, also ``emomerge leaderboard plot``). Importing this package imports no submodule.
"""
