"""The page template and stylesheet of ``report.html`` (the renderer fills in the sections).

Kept as Python strings, not .html/.css files: the ServerApp renders the report from the FAB, and a Flower
1.42 FAB carries only .py, .toml, .md, .yaml and .json files.
"""

from __future__ import annotations

from string import Template

__all__ = ["PAGE", "STYLESHEET"]

# $title, $stylesheet, $body, $footer: each already escaped HTML
PAGE = Template('''<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>$title</title><style>$stylesheet</style></head><body>$body<footer>$footer</footer></body></html>
''')

STYLESHEET = """
body{font-family:-apple-system,"Segoe UI",Helvetica,Arial,sans-serif;max-width:1150px;margin:0 auto;padding:0 18px 40px;
color:#1d2430;line-height:1.4;font-size:14px}
h1.banner{font-size:19px;margin:0 -18px 10px;padding:12px 18px;color:#fff}
h1.phantom{background:#7a4b00}h1.real{background:#124f8c}h1.unknown{background:#555}
h2{font-size:17px;border-bottom:2px solid #d6dce4;padding-bottom:3px;margin-top:28px}
table{border-collapse:collapse;margin:6px 0 8px;font-size:13px}
th,td{border:1px solid #cfd6df;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#eef2f6}tr.total td{font-weight:bold;background:#f6f8fa}
tr.selected td{background:#fff3c4}tr.problem td,tr.differs td{background:#fde2e1}
.alarm{background:#c62828;color:#fff;font-weight:bold;padding:10px 14px;border-radius:4px;font-size:15px}
p.alarm{font-size:13px}.holdout{background:#e3f0fb;border-left:5px solid #124f8c;padding:8px 12px;font-weight:bold}
.good{color:#1b5e20}.caution{background:#fff6e0;border-left:4px solid #e0a100;padding:6px 10px}
.error{background:#fde2e1;border-left:4px solid #c62828;padding:6px 10px;font-family:monospace}
.note{color:#4a5563}.bad{color:#c62828;font-weight:bold}.ok{color:#1b5e20}
figure{margin:8px 0}figure img{max-width:100%;border:1px solid #e1e5ea}figcaption{font-size:12px;color:#4a5563;max-width:900px}
.grid{display:flex;flex-wrap:wrap;gap:0 22px;align-items:flex-start}.grid section{flex:1 1 330px;min-width:0}
pre{background:#f3f5f7;padding:8px;overflow-x:auto}footer{margin-top:30px;font-size:11px;color:#777}
"""
