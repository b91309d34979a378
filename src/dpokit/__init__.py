"""dpokit: Direct Preference Optimization and its family of offline preference losses."""

__version__ = "0.1.0"
