"""Scrapes a Prometheus endpoint the way Prometheus would and parses the body
with the real parser for the content type it came back with (Debian's
python3-prometheus-client). Prints one JSON object: the content type, every
family with its type, and every label name seen.

usage: /usr/bin/python3 scrape_metrics.py URL openmetrics|classic
"""
import json
import sys
import urllib.request

from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families as parse_classic

ACCEPT = {
    # What Prometheus sends by default.
    "openmetrics": "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,"
    "text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
    # What a scraper without OpenMetrics support sends.
    "classic": "text/plain;version=0.0.4",
}

url, kind = sys.argv[1], sys.argv[2]
request = urllib.request.Request(url, headers={"Accept": ACCEPT[kind]})
with urllib.request.urlopen(request, timeout=5) as response:
    content_type = response.headers["Content-Type"]
    body = response.read().decode()
parse = parse_openmetrics if content_type.startswith("application/openmetrics-text") else parse_classic
families = {}
labels = set()
for family in parse(body):
    families[family.name] = family.type
    for sample in family.samples:
        labels.update(sample.labels)
print(json.dumps({"content_type": content_type, "families": families, "labels": sorted(labels)}))
