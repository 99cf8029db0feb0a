"""The command-line jobs: ``python -m curvlinops demo|influence|spectrum``.

Each job reproduces a study of the lecture on every installed backend and
writes a table, PNGs and a versioned JSON report. Their shared pieces (the
command line's checks, the thread plan and the processes that run backends
side by side, the JSON and report helpers) live here once; each job's problem,
training and study are modules of their own. Importing this package imports
no framework: the models the jobs train are built in ``curvlinops.backends``.
"""
