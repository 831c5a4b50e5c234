data "alicloud_images" "debian" {
  owners      = "system"
  name_regex  = var.image_name_regex
  most_recent = true
}

locals {
  # Fixed private addresses, so every node's user data can name the first node's etcd before
  # any instance exists (an instance's own attributes would make a dependency cycle).
  node_ips      = [for i in range(var.node_count) : cidrhost(var.vswitch_cidr, var.first_node_host + i)]
  etcd_endpoint = "http://${local.node_ips[0]}:2379"

  # The ali-vpc backend finds the region, instance and VPC of each node in its metadata, and
  # its credentials through the instance's RAM role. The table is named, not discovered, so
  # that the cluster programs exactly the table this module outputs.
  network_config = jsonencode({
    Network = var.pod_network
    Backend = {
      Type          = "ali-vpc"
      Mode          = var.mode
      RouteTableIDs = [alicloud_vpc.cluster.route_table_id]
      ClusterName   = var.cluster_name
    }
  })
}

resource "alicloud_instance" "node" {
  count = var.node_count

  instance_name        = "${var.cluster_name}-node-${count.index}"
  host_name            = "${var.cluster_name}-node-${count.index}"
  image_id             = data.alicloud_images.debian.images[0].id
  instance_type        = var.instance_type
  instance_charge_type = "PostPaid"
  system_disk_category = "cloud_essd"
  vswitch_id           = alicloud_vswitch.nodes.id
  private_ip           = local.node_ips[count.index]
  security_groups      = [alicloud_security_group.nodes.id]
  key_name             = var.key_name

  # The agent's credentials: the node policy's permissions, as STS tokens from the metadata
  # server.
  role_name = alicloud_ram_role.node.role_name

  internet_charge_type       = "PayByTraffic"
  internet_max_bandwidth_out = var.internet_bandwidth

  user_data = templatefile("${path.module}/../templates/node.sh.tftpl", {
    module              = "alicloud"
    boot_log            = "/var/log/cloud-init-output.log"
    cluster_name        = var.cluster_name
    node_ip             = local.node_ips[count.index]
    run_etcd            = count.index == 0
    etcd_endpoint       = local.etcd_endpoint
    network_config      = local.network_config
    cloudroutes_package = var.cloudroutes_package
    healthz_port        = var.healthz_port
    agent_unit          = file("${path.module}/../../deploy/cloudroutes.service")
    rt_protos           = file("${path.module}/../../deploy/rt_protos.conf")
  })

  tags = {
    "cloudroutes-cluster" = var.cluster_name
  }

  # The instance must not start without the permissions its role will hold.
  depends_on = [alicloud_ram_role_policy_attachment.node]
}
