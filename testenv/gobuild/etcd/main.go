// Command etcd is the etcd server, built from go.etcd.io/etcd/server/v3 at the
// version Kubernetes v1.36.3 pins, so test clusters run the etcd that release was
// tested with (Debian's etcd-server 3.4 is older than Kubernetes supports).
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
