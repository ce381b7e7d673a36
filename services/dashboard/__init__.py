"""Live views of the monitor's figures: `corral dashboard` in a browser, and the figures `corral top` draws
in a terminal (services/cli/top.py).

    samples.py  successive StatusReports turned into the figures a view shows (rates between them)
    server.py   the web dashboard's HTTP server: the page, its vendored charting library, JSON endpoints
    static/     the page and uPlot (vendored from the npm registry, with its licence)
"""
