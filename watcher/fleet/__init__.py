"""The fleet guard's etcd client: carries out the core's fleet actions, feeds answers back."""
