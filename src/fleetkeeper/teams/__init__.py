"""fleetkeeper.teams"""
