"""fleetkeeper.health"""
