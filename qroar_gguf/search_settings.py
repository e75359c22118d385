"""What `--search` is asked to do: its settings and their defaults.

Apart from search.py so that the command line can show these defaults without importing numpy.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

GRID = (0.8, 0.9, 1.0, 1.1, 1.25)
OBJECTIVES = ("ppl", "kld")
SPACES = ("both", "factors", "scales")
#: How candidates are chosen: coordinate descent on GRID, or CMA-ES (population.py) inside GRID's ends.
STRATEGIES = ("descent", "cmaes")
#: CMA-ES's first step, in band-multiplier units: for a band factor one GRID step; for a band scale a fifth
#: of one, since a scale multiplies W_Q and W_K alike (non-symmetric), so the band's logits by its square: the
#: descent measured band 3's scale at 1.1 raise the dev perplexity 28% where a factor step moved it under 1%
#: (docs/results.md's band search), and CMA-ES's first generation at 0.1 for both was 1-2.6x worse.
#: Candidates are rounded to CMAES_RESOLUTION.
CMAES_SIGMA = 0.1
CMAES_SCALE_STEP = 0.02
CMAES_RESOLUTION = 0.01
#: The Jane Austen novel (assets/austen.py) candidates are measured on when no dev text is given.
DEFAULT_DEV_TEXT = "Emma"
DEFAULT_DEV_CHUNKS = 1  # one full-context window per candidate (minutes each)
#: Band scales a search tries are non-symmetric unless asked (both W_Q and W_K *= a): symmetric scales
#: (W_K /= a) barely change 4-bit weight error, so a search over them measures noise.
SEARCH_SYMMETRIC = False
# The configuration docs/results.md's band-search section measures: from yarn, band factors only, five candidates (why
# factors only and why five: docs/results.md).
DEFAULT_BUDGET = 5
DEFAULT_SPACE = "factors"


@dataclass(frozen=True)
class SearchSettings:
    dev_text: Path | None = None  # None: DEFAULT_DEV_TEXT
    dev_ctx: int | None = None  # None: the target context
    dev_chunks: int | None = DEFAULT_DEV_CHUNKS  # None: every whole window of the dev text
    budget: int = DEFAULT_BUDGET
    seed: int = 0
    objective: str = "ppl"
    space: str = DEFAULT_SPACE
    type_k: str = "f16"
    grid: tuple[float, ...] = GRID
    cache: Path | None = None  # None: cache_dir()/search
    report: Path | None = None  # where to write the search's record and every candidate as JSON
    strategy: str = "descent"
    population: int | None = None  # cmaes: candidates per generation (None: CMA-ES's default for the dimension)
    workers: int = 1  # candidates measured at a time (each with the conversion's --threads)
    time_budget: float | None = None  # seconds after which no new candidate starts (None: no limit)
    gpu_layers: int | None = None  # layers on the GPU while measuring (None: all where libllama has a GPU back-end)
