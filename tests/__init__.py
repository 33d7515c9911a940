# A regular package, so `tests.daemon_harness` is ours: nlb-tools 0.0.4 installs a
# top-level `tests` package into site-packages, which would shadow a namespace package.
