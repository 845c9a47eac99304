"""The benchmark of ``tools/benchmark_table.py`` (every method against its baseline, over
seeds), by job:

* :mod:`kd.benchmark.suites`: the suites as data: families (teacher and student configs,
  schedules), the methods beside each baseline, where configs and runs live;
* :mod:`kd.benchmark.plan`: the runs in training order, and output folders holding another run;
* :mod:`kd.benchmark.record`: the record of finished runs (``docs/benchmark/runs.json``): a run's
  identity, what is finished, what must still train;
* :mod:`kd.benchmark.locks`: one process per run (a lock file in its output folder);
* :mod:`kd.benchmark.train`: training the planned runs through ``train_net.py``;
* :mod:`kd.benchmark.report`: mean ± std over seeds, gains, tables and chart.
"""
