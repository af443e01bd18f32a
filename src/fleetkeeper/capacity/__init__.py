"""fleetkeeper.capacity"""
