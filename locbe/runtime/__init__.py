"""The process: its OpenMP threads and wait policy (openmp), progress bars (progress), torchrun ranks (ranks),
the device and CPU cores (device), atomic file writes (fileio), the run-directory lock (runlock) and timing
(stopwatch).

May import: locbe.errors only; everything else in locbe builds on it."""
