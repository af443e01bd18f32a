"""Machine providers: terminate, replace and reboot the machine behind a Node
(Cluster API, Karpenter, AWS, GCE, Azure, an operator command, or the Node
object itself in a local cluster), with a durable ledger so no machine is
acted on twice. A layer between the components and the core: components call
it; it imports only the core."""
