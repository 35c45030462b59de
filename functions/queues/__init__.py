"""Vercel Queues subscribers: each module is one function that Vercel invokes with a message of its
topic (declared in pyproject.toml, ``[[tool.vercel.subscribers]]``; the build gives each a queue
trigger). They live apart from ``functions/*.py`` because they have no HTTP route."""
