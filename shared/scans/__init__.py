"""Site scans: crawl a customer's own site, through the egress guard, into an agent's knowledge.

``create_scan`` / ``get_scan`` serve the dashboard's API; ``run_scans`` is the worker (a Vercel
cron, or ``python -m shared.scans`` locally). See docs/scans.md.
"""

from shared.scans.schemas import PRODUCTION, ScanCreate, ScanEnvironment, ScanOut, get_scan_environment
from shared.scans.service import create_scan, get_scan
from shared.scans.worker import RunReport, run_scans

__all__ = [
    "PRODUCTION",
    "RunReport",
    "ScanCreate",
    "ScanEnvironment",
    "ScanOut",
    "create_scan",
    "get_scan",
    "get_scan_environment",
    "run_scans",
]
