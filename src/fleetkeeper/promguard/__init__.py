"""fleetkeeper.promguard"""
