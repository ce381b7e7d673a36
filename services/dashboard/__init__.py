"""Live views of the monitor's figures: `corral top` in a terminal and `corral dashboard` in a browser.

    samples.py  successive StatusReports turned into the figures a view shows (rates between them)
    top.py      the terminal dashboard (rich)
    server.py   the web dashboard's HTTP server: the page, its vendored charting library, JSON endpoints
    static/     the page and uPlot (vendored from the npm registry, with its licence)
"""
