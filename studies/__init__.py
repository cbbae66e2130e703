"""Measurements of the verdict itself: false alarms, detection thresholds, catch rates, flakiness.

Run from the checkout's root (``python -m studies.<name> --help``); each study writes a JSON file
under ``studies/results/`` and ``python -m studies.publish`` turns those into
``docs/verdict-study.md`` and ``reports/verdict_study.json``.
"""
