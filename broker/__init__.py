"""The contract every Corral component shares: settings, Redis keys, message schemas, the
request queue, the worker registry. Imports nothing else of Corral's."""
