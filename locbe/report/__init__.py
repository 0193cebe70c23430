"""Result tables and what feeds them: one run's rows against the published numbers (tables), runs over seeds and
their records (seeds), statistics (stats), the seed tables and seeds.png (seed_report), ``locbe compare``
(compare) and the PNG panels (panels).

May import: locbe.errors, locbe.runtime, locbe.data (class names); never locbe.training or locbe.method (a
report reads what runs wrote; it does not run them)."""
