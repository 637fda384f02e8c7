"""The study: every method x seed (x sweep setting) trained and evaluated, then tables and plots.

  runs.py     running the study (which runs, their configs, what finished), run_study;
  tables.py   the summary: statistics, paired differences, study.md, study.json, plots;
  command.py  the command: python -m clead_jax.study (console script: clead-study).
"""
