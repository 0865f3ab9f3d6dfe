"""features: acquires data (fetch, parse, filter, split) and embeds it (text and image features).

Stages here read and write files under the workspace; they know nothing of Prefect.
"""
