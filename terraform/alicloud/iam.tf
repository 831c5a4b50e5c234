# The permissions are the ali-vpc provider's own RAM policy documents, read from the repository
# so that the cluster always tests exactly what the provider ships. Never paste a copy here.

locals {
  ecs_assume_role = jsonencode({
    Version = "1"
    Statement = [{
      Effect    = "Allow"
      Action    = "sts:AssumeRole"
      Principal = { Service = ["ecs.aliyuncs.com"] }
    }]
  })
}

resource "alicloud_ram_role" "node" {
  role_name                   = "${var.cluster_name}-node"
  description                 = "cloudroutes agent on a ${var.cluster_name} node (ali-vpc)"
  assume_role_policy_document = local.ecs_assume_role
}

resource "alicloud_ram_policy" "node" {
  policy_name     = "${var.cluster_name}-ali-vpc-node"
  description     = "providers/policies/ali-vpc-node.json of cloudroutes"
  policy_document = file("${path.module}/../../providers/policies/ali-vpc-node.json")
}

resource "alicloud_ram_role_policy_attachment" "node" {
  role_name   = alicloud_ram_role.node.role_name
  policy_name = alicloud_ram_policy.node.policy_name
  policy_type = "Custom"
}

resource "alicloud_ram_role" "controller" {
  count = var.controller_role ? 1 : 0

  role_name                   = "${var.cluster_name}-controller"
  description                 = "cloudroutes cluster-mode controller for ${var.cluster_name} (ali-vpc)"
  assume_role_policy_document = local.ecs_assume_role
}

resource "alicloud_ram_policy" "controller" {
  count = var.controller_role ? 1 : 0

  policy_name     = "${var.cluster_name}-ali-vpc-controller"
  description     = "providers/policies/ali-vpc-controller.json of cloudroutes"
  policy_document = file("${path.module}/../../providers/policies/ali-vpc-controller.json")
}

resource "alicloud_ram_role_policy_attachment" "controller" {
  count = var.controller_role ? 1 : 0

  role_name   = alicloud_ram_role.controller[0].role_name
  policy_name = alicloud_ram_policy.controller[0].policy_name
  policy_type = "Custom"
}
