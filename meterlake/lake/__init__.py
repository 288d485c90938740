"""The lake: the substrate every part uses (data dir, Iceberg catalog and tables, the SQL runner), local or on AWS."""
