"""Small pipeline.yml texts shared by the fast tests."""

MINIMAL = """\
images:
  web:
    version: 1.0.0
    roles: [base, webservice]
environments:
  dev:
    image: web
"""
