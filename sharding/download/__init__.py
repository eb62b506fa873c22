"""Downloading: the HTTP fetcher, its SSRF guard and its time limits."""
