"""meterlake: API traffic into billable, per-tenant usage (local pipeline, AWS CDK app, forwarding to Amberflo).

The version is pyproject.toml's ``[project].version``, read from the installed distribution where it is needed
(``meterlake --version``): the Lambda bundles carry these modules without any distribution metadata.
"""
