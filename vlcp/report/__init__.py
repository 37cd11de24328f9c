"""OUT/report.html: folder.py reads OUT, sections.py/classes.py/plots.py build plain data, html.py renders templates/.
Layer: imports only vlcp.store (plus jinja2/markupsafe and the standard library); never torch or the layers above."""
