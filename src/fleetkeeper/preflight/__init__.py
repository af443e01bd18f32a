"""fleetkeeper.preflight"""
