"""``stackcomp search``: find the best stack under a budget with Optuna.

- :mod:`~stackcomp.search.space` — the space file (a recipe prefix plus ``search:``) and how a
  trial's choices become a recipe;
- :mod:`~stackcomp.search.study` — the study (sampler, storage in the run folder, resume) and
  one trial: planner checks, engine run, objectives through ``compare``;
- :mod:`~stackcomp.search.pruning` — the training callback that stops hopeless trials;
- :mod:`~stackcomp.search.output` — ``search.json``, the Pareto recipes, the leaderboard, the verdict.

docs/search.md describes the format and the folder.
"""

from stackcomp.search.space import (
           SearchSpace,
           SearchSpaceError,
           load_space,
           space_from_dict,
)
from stackcomp.search.study import (
           SearchError,
           SearchPaths,
           dry_run,
           parse_duration,
           run_search,
)

__all__ = ["SearchError", "SearchPaths", "SearchSpace", "SearchSpaceError", "dry_run", "load_space",
           "parse_duration", "run_search", "space_from_dict"]
