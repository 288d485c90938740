"""The AWS deployment of meterlake: one CDK stack per module, wired by :mod:`cdk_stacks.app`."""
