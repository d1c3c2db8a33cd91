"""Reports people look at: one self-contained HTML page per verify, bench and merge-many run.

``html`` holds the page machinery (escaping, the CSP, inline SVG charts, :func:`render_table_page`
for scripts with plain rows); one module per page renders one report object. The pages know the
report records only (imported for type checking; verify's result records at render time), so
importing them loads no torch; the runs that own the reports (``verify()``, ``merge_many()``, the
``bench`` command) call them.
"""
