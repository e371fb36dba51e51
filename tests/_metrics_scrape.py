"""A server's Prometheus metrics as the tests read them: its HTTP endpoint scraped and parsed with prometheus-client's
own parser, one value per sample, and how much a counter grew between two scrapes."""

from __future__ import annotations

import urllib.request

from prometheus_client.parser import text_string_to_metric_families

SCRAPE_TIMEOUT_S = 30

Scrape = dict[tuple[str, tuple[tuple[str, str], ...]], float]
"""Every sample of one scrape: (name, sorted labels) -> value."""


def scrape(port: int) -> Scrape:
    """Every sample on the endpoint at ``http://127.0.0.1:<port>/metrics``."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=SCRAPE_TIMEOUT_S) as response:
        text = response.read().decode()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(metrics: Scrape, name: str, **labels: str) -> float:
    """The sample ``name`` with exactly ``labels``; 0 where the scrape has none (a counter not yet counted)."""
    return metrics.get((name, tuple(sorted(labels.items()))), 0.0)


def grown(before: Scrape, after: Scrape, name: str, **labels: str) -> float:
    """How much the sample grew from ``before`` to ``after``."""
    return value(after, name, **labels) - value(before, name, **labels)
